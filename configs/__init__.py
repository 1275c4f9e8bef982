"""Recipes: one file per run, each a table of its differences from configs/common.py (`from configs import common`)."""
