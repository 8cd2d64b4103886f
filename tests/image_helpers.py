"""Test helpers for models built from FastReID configs (needs FastReID)."""


def random_weights(config_file, path, opts=(), images=None):
    """A checkpoint of the config's model with seeded random weights (4 classes); given
    ``images``, the BatchNorm statistics are set on them (as training would), so that features
    have a trained model's scale (an uncalibrated deep ResNet's grow without bound)."""
    import torch
    from fastreid.modeling import build_model

    from nformer_plugin.fastreid_ext.config import load_config

    cfg = load_config(config_file, ["MODEL.HEADS.NUM_CLASSES", "4", "MODEL.DEVICE", "cpu",
                                    "MODEL.BACKBONE.PRETRAIN", "False"] + list(opts))
    torch.manual_seed(0)
    model = build_model(cfg)
    if images is not None:
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average
        model.train()
        with torch.no_grad():
            feature_map = model.backbone(model.preprocess_image(images))
            if hasattr(model, "heads"):
                model.heads(feature_map)
        for bn in bns:
            bn.momentum = 0.1
    torch.save({"model": model.state_dict()}, path)
    return str(path)
