"""Multi-seed ablation experiments: `python -m hmnas_keras.experiments` (see __main__.py).

`plan` decides the runs (no TensorFlow), `runner` runs them as search
processes, `results` tabulates them into results.json, results.md and
results.png.
"""
