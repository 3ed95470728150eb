def write_hest_layout(root, **kwargs):
    raise NotImplementedError("write_hest_layout is being written (issue 2)")
