"""The contract between the export and serving: where an exported model keeps its metadata.

The export phase (`hmnas_keras.export.formats.model_metadata`) writes a JSON
document under `METADATA_KEY` in the ONNX model's metadata (and as the TFLite
flatbuffer's metadata entry of that name), with format
`METADATA_FORMAT`; `hmnas_keras.serving` reads it. Defined here, on the
serving side, because serving must run without the rest of the package: the
export imports these names, never the reverse. No dependencies at all.
"""

METADATA_KEY = "hmnas_keras.metadata"
METADATA_FORMAT = "hmnas_keras/classifier"
METADATA_VERSION = 1
