"""testsets"""
