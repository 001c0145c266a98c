# DigitalMe's container image (docs/docker.md).
#
#   docker build -t digitalme .                  # wheels from requirements/app.lock (PyPI)
#   docker run --rm -v digitalme-data:/var/lib/digitalme digitalme migrate
#   docker run -d -v digitalme-data:/var/lib/digitalme -p 127.0.0.1:8080:8080 \
#       -v ./secrets:/run/secrets:ro digitalme      # serve (the default command)
#
# The digitalme role builds it on the host from the release package it already ships
# (wheels/ of the app and every pinned dependency, no network):
#   podman build --build-arg WHEELS=package --network=none --timestamp=... CONTEXT
#
# Stages: tools (a throw-away pip) -> wheels (built from the lock, or the package's) ->
# install (a virtualenv without pip, bytecode compiled by content hash) -> the image:
# the base, a non-root user, the virtualenv. No compiler, pip or setuptools in it.

# The base: Python 3.11 on Debian 12 (python:3.11-slim-bookworm from a registry, or a base
# made with debootstrap and imported: sandbox/sandbox.py container-base, docs/docker.md).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
# Where the wheels come from: "lock" builds them from requirements/app.lock and the sources
# (needs PyPI); "package" takes the wheels/ folder of the build context (a release package
# of the digitalme role: no network needed).
ARG WHEELS=lock

FROM ${BASE_IMAGE} AS tools
# pip in a virtualenv of its own: it builds and installs, and stays in this stage.
RUN python3 -m venv /opt/tools

FROM tools AS wheels
ARG WHEELS
# pip's own settings, for a mirror or a local index (pip's defaults otherwise).
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_FIND_LINKS=
ARG PIP_NO_INDEX=0
ARG PIP_TRUSTED_HOST=
# The context (filtered by .dockerignore): the sources and the lock, or a release package.
COPY . /src
RUN set -eu; \
    case "$WHEELS" in \
    lock) \
        /opt/tools/bin/pip --disable-pip-version-check wheel --no-cache-dir \
            --only-binary=:all: --wheel-dir /wheels --requirement /src/requirements/app.lock; \
        /opt/tools/bin/pip --disable-pip-version-check wheel --no-cache-dir --no-deps \
            --wheel-dir /wheels /src ;; \
    package) \
        cp -r /src/wheels /wheels ;; \
    *) echo "WHEELS must be lock or package, not '$WHEELS'" >&2; exit 2 ;; \
    esac

FROM tools AS install
COPY --from=wheels /wheels /wheels
# The app's virtualenv has no pip: the tools' pip installs into it (--python). Bytecode is
# compiled with hashes of the sources, not their times, so the same wheels give the same
# files (reproducible layers); unchecked: the sources in an image never change.
RUN python3 -m venv --without-pip /opt/digitalme/venv \
 && /opt/tools/bin/pip --disable-pip-version-check --python /opt/digitalme/venv/bin/python \
        install --no-index --no-cache-dir --no-compile --find-links /wheels digitalme \
 && /opt/digitalme/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        /opt/digitalme/venv/lib \
 && /opt/digitalme/venv/bin/digitalme --version

FROM ${BASE_IMAGE}
# Nothing that installs packages at run time: pip, setuptools and ensurepip go (the base
# ships them: python:*-slim in /usr/local, Debian's python3-venv in /usr). The service's
# user and group (10001, no shell, no password) are written directly: useradd would stamp
# the day into /etc/shadow, and the layers are to be reproducible.
RUN set -eu; \
    rm -rf /usr/local/bin/pip* /usr/local/lib/python3*/site-packages/pip \
        /usr/local/lib/python3*/site-packages/pip-* /usr/local/lib/python3*/site-packages/setuptools* \
        /usr/local/lib/python3*/site-packages/_distutils_hack \
        /usr/local/lib/python3*/site-packages/distutils-precedence.pth \
        /usr/local/lib/python3*/site-packages/wheel /usr/local/lib/python3*/site-packages/wheel-* \
        /usr/local/lib/python3*/ensurepip /usr/lib/python3*/ensurepip /usr/share/python-wheels; \
    echo 'digitalme:x:10001:10001:DigitalMe:/var/lib/digitalme:/usr/sbin/nologin' >> /etc/passwd; \
    echo 'digitalme:x:10001:' >> /etc/group; \
    mkdir -p /var/lib/digitalme; chown 10001:10001 /var/lib/digitalme; chmod 0750 /var/lib/digitalme
COPY --from=install /opt/digitalme/venv /opt/digitalme/venv

# Settings: DIGITALME_* variables (docs/configuration.md); secrets as files named like
# their variable in $CREDENTIALS_DIRECTORY (Docker and Compose secrets are mounted in
# /run/secrets), never in the environment.
ENV PATH=/opt/digitalme/venv/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DIGITALME_LISTEN=0.0.0.0:8080 \
    DIGITALME_DB_PATH=/var/lib/digitalme/digitalme.db \
    CREDENTIALS_DIRECTORY=/run/secrets
USER 10001:10001
WORKDIR /var/lib/digitalme
# The database (and its -wal, -shm) lives on a volume; `migrate` creates and migrates it.
VOLUME ["/var/lib/digitalme"]
EXPOSE 8080
# /health from inside the container, on the address the service binds (an engine that
# hands the service a listening socket, as the digitalme role's does, checks from outside).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; host, _, port = os.environ['DIGITALME_LISTEN'].rpartition(':'); host = {'0.0.0.0': '127.0.0.1', '[::]': '[::1]'}.get(host, host); urllib.request.urlopen(f'http://{host}:{port}/health', timeout=4)"]
ENTRYPOINT ["digitalme"]
CMD ["serve"]
