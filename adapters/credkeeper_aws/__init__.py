"""credkeeper's aws store: being built; until then its schemes report it as not installed."""

raise ImportError("credkeeper_aws is not available yet", name="credkeeper_aws")
