"""ssjdn"""
