"""The application layer: what the ``nformer`` commands do, as functions (the command modules
only parse arguments and print). Modules: ``extract`` (images -> feature file), ``export``
(the feature extractor -> ONNX / TorchScript)."""
