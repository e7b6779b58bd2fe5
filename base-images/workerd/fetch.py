#!/usr/bin/env python3
"""Download the package archives an image is assembled from, and check their pins.

Reads recipe.json beside this file (the workerd base image), or the recipe given with --recipe
(base-images/controller/recipe.json: the controller's own image), fetches each archive with the
ordinary package clients (`npm pack`, `apt-get download`) into the archive cache, and verifies
every sha256. Archives already
in the cache with the right sha256 are not fetched again.

Debian replaces package versions on its mirrors (security updates). When a pinned version can no
longer be downloaded, or the archive differs from its pin, run with --refresh-pins: it downloads the
current candidate versions and rewrites recipe.json with their versions and sha256 (review and
commit that change: it changes the base image digest).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def default_cache():
    if os.environ.get("WORKERBUNDLE_ARCHIVES"):
        return os.environ["WORKERBUNDLE_ARCHIVES"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "workerbundle", "archives")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stdout.strip()}")
    return result.stdout


def only_file(directory, what):
    files = [f for f in os.listdir(directory) if not f.startswith(".")]
    if len(files) != 1:
        raise RuntimeError(f"expected one archive for {what}, found {files}")
    return os.path.join(directory, files[0])


def fetch_npm(entry, into, refresh):
    spec = f"{entry['npm_package']}@{'latest' if refresh else entry['version']}"
    run(["npm", "pack", "--silent", spec], into)
    return only_file(into, spec)


def fetch_deb(entry, into, refresh):
    spec = entry["package"] if refresh else f"{entry['package']}={entry['version']}"
    run(["apt-get", "download", spec], into)
    return only_file(into, spec)


def deb_version(path):
    return run(["dpkg-deb", "--field", path, "Version"], os.path.dirname(path)).strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=os.path.join(HERE, "recipe.json"))
    parser.add_argument("--cache", default=default_cache(), help="archive cache (default: %(default)s)")
    parser.add_argument("--refresh-pins", action="store_true",
                        help="fetch the current versions and rewrite the recipe's versions and sha256")
    args = parser.parse_args()

    with open(args.recipe) as f:
        recipe = json.load(f)
    os.makedirs(args.cache, exist_ok=True)

    # The controller's recipe has no npm archive: its binary is workerbundle itself.
    entries = ([("npm", recipe["workerd"])] if "workerd" in recipe else []) + [("deb", d) for d in recipe["debs"]]
    problems = []
    for kind, entry in entries:
        target = os.path.join(args.cache, entry["archive"])
        if not args.refresh_pins and os.path.exists(target) and sha256_of(target) == entry["sha256"]:
            print(f"cached   {entry['archive']}")
            continue
        with tempfile.TemporaryDirectory(dir=args.cache) as scratch:
            # apt-get download drops privileges to _apt, which must be able to write here.
            os.chmod(scratch, 0o777)
            try:
                got = (fetch_npm if kind == "npm" else fetch_deb)(entry, scratch, args.refresh_pins)
            except RuntimeError as err:
                name = entry.get("npm_package") or entry["package"]
                problems.append(f"{name} {entry['version']}: {err}\n"
                                f"  (a pinned version the registry no longer serves: run {sys.argv[0]} --refresh-pins)")
                continue
            digest = sha256_of(got)
            if args.refresh_pins:
                entry["archive"] = os.path.basename(got)
                entry["sha256"] = digest
                entry["version"] = (deb_version(got) if kind == "deb"
                                    else os.path.basename(got).rsplit("-", 1)[1][: -len(".tgz")])
                target = os.path.join(args.cache, entry["archive"])
            elif digest != entry["sha256"]:
                problems.append(f"{entry['archive']}: sha256 {digest} does not match the pin {entry['sha256']}; "
                                f"the registry serves a different archive under this version. Run "
                                f"{sys.argv[0]} --refresh-pins, review, and commit the new pins.")
                continue
            shutil.move(got, target)
            print(f"fetched  {entry['archive']} sha256:{digest}")

    if args.refresh_pins:
        with open(args.recipe, "w") as f:
            json.dump(recipe, f, indent=2)
            f.write("\n")
        print(f"rewrote {args.recipe}")
    if problems:
        print("\n".join([f"error: some archives of {args.recipe} could not be fetched:"] + problems), file=sys.stderr)
        return 1
    print(f"archives ready in {args.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
