"""Answering few-shot tasks for other programs: one task per request (support set, its
labels, queries), parsed and bounded in ``task``, adapted once per distinct support set
(``cache``), served by MLflow's scoring server (``mlflow_model``) or a Ray Serve
deployment (``ray_serve``)."""
