"""A toy world where D-OPSD can be measured end to end on a CPU (issue #7).

world.py     procedural 32x32 scenes (shape x colour x size x position x background) + captions
models.py    the encoder (text, or image patches + text in context), the pixel-space DiT, the classifier
build.py     trains base (flow matching) -> 4-step distilled model -> classifier; writes the checkpoint folder
pipeline.py  ToyDiTPipeline: loads the folder, samples, loads our LoRA file
evaluate.py  concept / quality (Frechet distance, sharpness) / prior-knowledge metrics
experiment.py  SFT vs D-OPSD (through train()) over seeds -> benchmarks/results/toy-*.md/json
"""
