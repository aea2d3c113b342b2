"""The head-level Transformer-SSM hybrid (issue 3). Registration with the Auto classes happens here."""
