def synthetic_visium(n_spots=400, image_mpp=0.5, seed=0, **kwargs):
    raise NotImplementedError("synthetic_visium is being written (issue 2)")
