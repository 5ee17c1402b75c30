"""Flower apps that train the glucose twin across hospitals."""
