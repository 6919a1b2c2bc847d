"""oci2disk: Dockerfiles and container images to bootable disks, without privileges."""

__version__ = "0.1.0"
