"""``edgepack sign`` and ``edgepack keygen``: sign bundles offline with ed25519.

Verification is ``edgepack verify BUNDLE --key PUB`` (edgepack/cli/build.py); the work lives in
:mod:`edgepack.signature` and :mod:`edgepack.keys`, which are device side.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("sign")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(path_type=Path),
              help="ed25519 private key (PEM, mode 600): from `edgepack keygen` or "
              "`edgepack repo init` (e.g. REPO/keys/targets.key).")
@click.option("--archive", is_flag=True,
              help="Also write BUNDLE.tar (as `build --archive` does), signature included, "
              "for USB or sneakernet transport; an older BUNDLE.tar is replaced.")
def sign(bundle: Path, key: Path, archive: bool) -> None:
    """Sign BUNDLE: write provenance.intoto.jsonl, a DSSE envelope holding an in-toto
    statement (SLSA provenance v1) over manifest.json and every file it lists.

    The bundle is verified first; a bundle that does not match its manifest is not signed
    (exit 6). Signing again replaces the signature.
    """
    from edgepack.keys import signing_keyid
    from edgepack.signature import sign_bundle

    path = sign_bundle(bundle, key)
    click.echo(f"signed: {path}\nkey id: {signing_keyid(key)}")
    target = bundle
    if archive:
        from edgepack.bundle import archive_bundle

        target = archive_bundle(bundle, bundle.with_name(bundle.name + ".tar"))
        click.echo(f"archive: {target}")
    click.echo(f"verify on the device with: edgepack verify {target} --key PUBLIC.pub")


@click.command("keygen")
@click.argument("name", required=False, type=click.Path(path_type=Path))
@click.option("--public-of", "public_of", type=click.Path(path_type=Path), default=None,
              help="Instead of a new key, write the .pub of this existing private key "
              "(e.g. a `repo init` key) beside it.")
def keygen(name: Path | None, public_of: Path | None) -> None:
    """Create an ed25519 signing key: NAME.key (private, mode 600: keep it on the build
    machine) and NAME.pub (give it to devices for `verify --key` / `serve
    --require-signature`)."""
    from edgepack.errors import UsageError
    from edgepack.keys import generate_keypair, write_public_key

    if public_of is not None:
        if name is not None:
            raise UsageError("keygen takes NAME or --public-of KEY, not both")
        click.echo(f"public key: {write_public_key(public_of)}")
        return
    if name is None:
        raise UsageError("keygen needs NAME (writes NAME.key and NAME.pub)",
                         hint="for example: edgepack keygen ~/.config/edgepack/release")
    key_path, pub_path = generate_keypair(name)
    click.echo(f"private key: {key_path} (mode 600; never copy it to a device)\n"
               f"public key:  {pub_path}")
