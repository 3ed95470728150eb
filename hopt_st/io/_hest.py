def read_hest(*args, **kwargs):
    raise NotImplementedError("read_hest is being written")
