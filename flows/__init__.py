"""Prefect flows and the twinfed command line: what a site's data engineer runs."""
