"""Disk images: partition tables, the ext filesystem reader, and qemu-img."""
