"""Sources that are not container images: disk images (``disk:``) and live ISOs (``iso:``).

Each one yields an :class:`~oci2disk.oci.layout.OciImage` (one uncompressed layer holding
the canonical rootfs tar, and an image config), so that flatten, every output and
``verify`` work on it unchanged.
"""
