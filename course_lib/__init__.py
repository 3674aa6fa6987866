"""course_lib: the finished pieces of "Stable Diffusion from scratch, in 8 GB".

One module per course concept, in the order the notebooks introduce them:
    settings    run modes (COURSE_QUICK) and the default device
    data        emoji and photos, loaded offline as tensors in [-1, 1]
    schedules   noise schedules (linear, scaled-linear, cosine, sigmoid) and their tables
    forward     the forward process: one Markov step, the closed form, the posterior
    plotting    image grids, noising strips, schedule curves (matplotlib)
    widgets     the logic behind the notebooks' sliders (matplotlib; ipywidgets only in `live`)

The core modules (settings, data, schedules, forward) never import matplotlib or ipywidgets.
"""

__version__ = "0.1.0"
