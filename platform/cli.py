"""stageflow command line."""
def main():\n    pass
