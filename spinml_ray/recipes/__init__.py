"""Named request recipes (`recipe: NAME` in a request): settings files shipped with the package."""
