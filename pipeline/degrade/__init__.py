"""degrade"""
