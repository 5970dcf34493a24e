"""OpenCLIP's side of the interop test, run by the interpreter of the OpenCLIP environment
(it imports open_clip, never threetowers).

Usage: python open_clip_side.py REQUEST.json. The request names an exported folder, image
files and captions; the answer (an .npz at the request's "out") holds OpenCLIP's image and
text embeddings (normalised, and as its encoders give them), its token ids, exp(logit_scale)
and the logit bias (nan if none).
"""

import json
import sys

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image


def main(request_path: str) -> None:
    request = json.loads(open(request_path).read())
    name = f"local-dir:{request['model']}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(path)) for path in request["images"]])
        image_features = torch.cat([model.encode_image(part) for part in pixels.split(256)])
        ids = tokenizer(request["texts"])
        text_features = torch.cat([model.encode_text(part) for part in ids.split(256)])
        images, texts = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        bias = model.logit_bias if model.logit_bias is not None else torch.tensor(float("nan"))
        np.savez(
            request["out"],
            pixels=pixels.numpy(),
            images=images.numpy(),
            texts=texts.numpy(),
            image_features=image_features.numpy(),
            text_features=text_features.numpy(),
            ids=ids.numpy(),
            logit_scale=model.logit_scale.exp().numpy(),
            logit_bias=bias.numpy(),
            model_class=np.array(type(model).__name__),
            version=np.array(open_clip.__version__),
        )


if __name__ == "__main__":
    main(sys.argv[1])
