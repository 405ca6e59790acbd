"""Test utilities shipped with the package (as ``torch.testing``): the deploy zoo that the tests and
``scripts/deploy_zoo.py`` share."""
