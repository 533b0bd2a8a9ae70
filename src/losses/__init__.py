"""Training losses shared by the recipes."""
