"""The fit of a reading to its image (not in the paper; docs/fitting.md).

landmarks.py: FLAME vertices found in the image by a detector the estimator stage trains;
fit.py: the estimator's reading refined to those landmarks, then to the image's pixels through
the renderer, so that I_R lands on the face.
"""
