#!/usr/bin/env bash
# The OpenCLIP environment of the interop tests, apart from the project's (.venv), because
# OpenCLIP needs torchvision and torchvision breaks transformers' vision classes there.
# torch stays the pinned CPU build; PyPI's torchvision cannot register its C++ operators
# beside it, so the two modules that register them are made to tolerate that: OpenCLIP's
# image transforms are pure Python and need none of them.
set -euo pipefail
ENV=${1:?usage: build_env.sh ENV_DIR}
TORCH=torch==2.13.0
python3 -m venv "$ENV"
"$ENV/bin/pip" install --quiet --upgrade pip
"$ENV/bin/pip" install --quiet "$TORCH" numpy pillow
"$ENV/bin/pip" install --quiet "$TORCH" torchvision==0.28.0 open-clip-torch==3.3.0 \
    timm==1.0.31 transformers==5.24.0
vision=$("$ENV/bin/python" -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('torchvision').origin))")
for module in _meta_registrations _autograd_registrations; do
    original="$vision/$module.py.orig"
    [ -f "$original" ] || mv "$vision/$module.py" "$original"
    printf 'try:\n    exec(compile(open(__file__ + ".orig").read(), __file__, "exec"))\nexcept Exception:  # operators this torch build lacks\n    pass\n' > "$vision/$module.py"
done
"$ENV/bin/python" -c "import open_clip; print('OpenCLIP', open_clip.__version__, 'in', '$ENV')"
