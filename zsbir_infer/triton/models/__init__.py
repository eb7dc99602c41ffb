"""Triton Python-backend models (``model.py`` of zsbir_preprocess, zsbir_encoder and zsbir_topk).

They run inside Triton's Python backend stub, never in a zsbir process: :mod:`zsbir_infer.triton.repository`
copies them into the repository. Each first adds the entries of ``$ZSBIR_PYTHONPATH`` to ``sys.path`` (the stub
ignores ``$PYTHONPATH``), then imports numpy, PIL / onnxruntime and ``zsbir_infer`` from there.
"""
