"""Snapshots: root filesystems for RUN, overlay and copy snapshotters (containerd vocabulary).
"""
