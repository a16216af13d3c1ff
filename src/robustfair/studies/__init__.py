"""Studies: grids of small training runs and their analysis.

- :mod:`.disparity`: the accuracy-disparity study of AT-on-AD (Hu et al., ICML 2023,
  arXiv:2211.15762): standard vs adversarial training over norm × ε × imbalance ratio R × seed,
  the gap of accuracy disparity and the gap of standard accuracy (their Figure 1).
- :mod:`.linear`: the exact worst-case perturbation of a linear classifier and a trainer that
  fits many linear models (learning rates × methods) at once with early stopping.
- :mod:`.trainer`: the same early-stopping protocol for any network (MLP, VGG) with PGD.
"""
