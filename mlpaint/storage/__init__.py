"""Where things are kept: object stores, a local folder or an S3 prefix behind one interface
(`stores`), and the catalog of every artefact mlpaint makes on them (`catalog`)."""
