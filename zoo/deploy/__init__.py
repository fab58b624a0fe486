"""Layer 6: using a trained model: prediction, embeddings, ONNX/TorchScript export and PEFT
adapter exchange. Imports the layers below.
"""
