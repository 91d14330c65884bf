"""Digits as images: a drawing brought to an MNIST digit (`preprocess`, the one function the
server, training and tests share), pen strokes drawn as the page draws them (`drawing`), and
augmented copies that look like what people draw (`augment`)."""
