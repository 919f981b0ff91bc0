"""A toy world where D-OPSD can be measured end to end on a CPU (issue #7; docs/toy.md).

What a user runs (`lowvram-dopsd demo --world toy`, the `toy` family) ships here:
world.py     procedural 32x32 scenes (shape x colour x size x position x background) + captions
models.py    the encoder (text, or image patches + text in context), the pixel-space DiT, the classifier
pipeline.py  ToyDiTPipeline: loads the folder, samples, loads our LoRA file
evaluate.py  concept / quality (Frechet distance, sharpness) / prior-knowledge metrics
The research code that made the checkpoints and the results is not installed: experiments/toy/
(build.py, experiment.py), run from the repository root.
"""
