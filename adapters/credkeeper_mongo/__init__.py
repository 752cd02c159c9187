"""credkeeper's mongo store: being built; until then its schemes report it as not installed."""

raise ImportError("credkeeper_mongo is not available yet", name="credkeeper_mongo")
