"""Device profiles (both sides): what a device offers a model and where each figure came from.

``profile`` holds the types and derived figures and imports none of the others;
``validation`` checks data against the schema; ``catalog`` loads shipped and user TOML files;
``detect`` profiles the machine it runs on; ``resolve`` turns a ``--device`` value (id, file,
``local``) into a profile. Stdlib only, so it runs on the device as well as the build machine.
"""
