"""Executors run the pipeline's components. `Components` is the one interface; `ort.LocalComponents`
runs ONNX Runtime in-process and `tessera.triton.bls.BlsComponents` calls the component models over BLS."""
