"""demo_fixtures"""
