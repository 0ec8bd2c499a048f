"""The contracts every other package stands on: bands and scenes, tiling, metrics,
bundles (build, sign, verify) and bus messages.

Imports only numpy, msgpack, tifffile, the standard library and `cryptography`; the command
client (`shared.client`) adds pyzmq, which the `onboard` and `sim` extras install.
"""
