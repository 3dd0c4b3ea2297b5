"""iSCSI on the host for the iscsi-* scenarios: a private tgtd (target.py) and QEMU's initiator (guest.py)."""
