"""Expert prediction for decode: routing traces, a learned layer-level predictor, baselines.

- trace.py:     the trace format (safetensors chunks + meta.json) and loaders
- tracer.py:    RoutingTracer (routing hooks on a loaded engine) and trace_prompts
- features.py:  popularity, affinity, activation path, gate lookahead (tensors, any device)
- model.py:     Predictor: the runtime API (Predictor.load, .predict, .scores)
- train.py:     train_predictor on traces (CPU, minutes)
- baselines.py: the predictors we compare against, by name
- evaluate.py:  metrics, tables and plots on held-out traces
- cli.py:       duoserve trace | train-predictor | eval-predictor
"""
