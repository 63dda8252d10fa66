"""Datasets as files, without Prefect or MLflow: the manifest contract (`manifest`), the image readers
(`images` dispatches, `pixels` holds their shared guards, `dicom` reads DICOM), synthetic phantoms,
importers, preprocessing with its cache, the Great Expectations gate (`expectations`,
`validation`, `data_docs`) and its per-image rules at the door of scoring (`admission`), and DVC
versioning of the production dataset and the import workspaces (`versioning`)."""
