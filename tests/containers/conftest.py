"""Fixtures for the container tests: one compose project for the session, on a copy of the
project owned by the image's user, torn down with its volumes at the end (tests/containers/run.sh
also removes it if pytest itself dies).

The pipeline runs once and in order, as a user would: train -> merge -> serve-cpu; the tests
check what each step left in the shared volumes.
"""

from __future__ import annotations

import os
import secrets

import pytest

from tests.containers.stack import ENABLED, Result, Stack, copy_project, free_port, image_user, stack_env


@pytest.fixture(scope="session")
def image() -> str:
    return os.environ.get("QLORA_IMAGE", "qlora-stack:latest")


@pytest.fixture(scope="session")
def stack(image, tmp_path_factory) -> Stack:
    if not ENABLED:
        pytest.skip("container tests run with `make test-containers`")
    directory = copy_project(tmp_path_factory.mktemp("project"))
    if os.geteuid() == 0:
        # A user's checkout belongs to the UID the image was built for (USER_UID), so the
        # notebook service can save into the mounted project.
        uid, gid = image_user(image)
        for path in [directory, *directory.rglob("*")]:
            os.lchown(path, uid, gid)
        directory.chmod(0o755)
    project = os.environ.get("QLORA_TEST_PROJECT") or f"qlora-test-{secrets.token_hex(3)}"
    s = Stack(project=project, directory=directory, env=stack_env(image))
    print(f"[stack] project {project} in {directory}")
    yield s
    s.down()


@pytest.fixture(scope="module")
def port() -> str:
    """A host port of the module's own, for a server it starts: serve-cpu, which other tests keep
    running, holds SERVE_PORT."""
    return str(free_port())


@pytest.fixture(scope="session")
def trained(stack) -> Result:
    """`train` as it ships: the quickstart recipe, into the outputs volume."""
    return stack.run_named(f"{stack.project}-train-main", "train").ok()


@pytest.fixture(scope="session")
def merged(stack, trained) -> Result:
    """`merge` as it ships: reads the adapter train wrote, writes outputs/quickstart/merged."""
    return stack.run("merge").ok()


@pytest.fixture(scope="session")
def server(stack, merged) -> str:
    """serve-cpu (profile cpu) on the merged model; returns its URL on the host."""
    result = stack.compose("up", "-d", "--wait", "--wait-timeout", "600", "serve-cpu")
    if result.returncode != 0:
        print(stack.logs("serve-cpu"))
    result.ok()
    return f"http://127.0.0.1:{stack.env['SERVE_PORT']}"
