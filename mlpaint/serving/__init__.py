"""MLPaint: the REST API and the drawing page, served from a published bundle."""
