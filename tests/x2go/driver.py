"""Drive the real python-x2go (Debian's package) through folder sharing, step by step.

Runs under the Python that has python-x2go (``/usr/bin/python3`` with
Debian's paramiko 2.12, or a venv of it with another paramiko), not under the
test suite's Python.  The test starts it as a subprocess and talks to it:

* argv[1] is a JSON object (see ``main``);
* every event is one stdout line ``@@x2go-driver {json}``;
* after each event the driver waits for one command line on stdin
  (``next``, ``unshare <path>``, ``unshare_all``, ``quit``).

Modes: ``stock`` (python-x2go as shipped), ``ours`` (after
``x2go_sftp.integrate.install()``, or ``install(outer_gcm=...)`` with the cfg
key ``outer_gcm``) and ``bare`` (our tunnel class put into
``x2go.sftpserver`` without ``install()``; see ``run_bare``).

What runs is python-x2go's own code: ``X2GoSession.connect`` (its control
session over a real sshd), ``X2GoControlSession.list_sessions`` (the real
``x2golistsessions``), the terminal backend built exactly as
``X2GoControlSession.resume`` builds it, then ``X2GoTerminalSession.start_sshfs``
/ ``start_printing`` / ``start_mimebox`` and ``X2GoSession.share_local_folder``
/ ``unshare_local_folder``, which run the real ``x2gomountdirs`` and
``x2goumount-session`` on the server.  Only the graphical part of a session
start is left out (see ``register_server_session``).
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from typing import Any

MARK = "@@x2go-driver "

# How long we wait for the server-side session registration commands.
EXEC_TIMEOUT = 60


def emit(event: str, **data: Any) -> None:
    sys.stdout.write(MARK + json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


def wait_command() -> list[str]:
    # python-x2go runs under gevent: a plain blocking read would stall every greenlet,
    # the SSH transport and our tunnel included.  select() is cooperative once patched.
    select.select([sys.stdin], [], [])
    line = sys.stdin.readline()
    if not line:
        return ["quit"]
    return line.rstrip("\n").split(" ", 1)


def run_remote(control: Any, cmd: str) -> tuple[str, str]:
    """Run a shell command on the X2Go server through python-x2go's control session."""
    # The trailing newline keeps python-x2go's end-of-output marker off our last line.
    _, stdout, stderr = control._x2go_exec_command(cmd + "; echo", timeout=EXEC_TIMEOUT)
    return stdout.read().decode(), stderr.read().decode()


def register_server_session(control: Any, name: str, ports: dict[str, int], agent_pid: int) -> None:
    """Register a running session in the X2Go server's session database.

    This is the stand-in for ``x2gostartagent``: it calls the same two X2Go
    server helpers ``x2gostartagent`` calls (``x2goinsertsession`` and
    ``x2gocreatesession``), but starts no ``x2goagent`` (an NX X server) and
    the client starts no ``nxproxy``: that graphical part needs an X display
    on the client and plays no role in folder sharing.
    """
    display = name.split("-")[1]
    # x2gostartagent creates these before anything is shared: ~/.x2go/ssh receives the
    # key bundle of share_local_folder(), ~/.x2go/C-<session> the sshfs log, and
    # x2gomountdirs makes its mount points under /tmp/.x2go-$USER.
    out, err = run_remote(control, f'mkdir -p -m 700 ~/.x2go/ssh ~/.x2go/C-{name} "/tmp/.x2go-$USER"')
    if err.strip():
        raise RuntimeError(f"cannot create the session directories: {err!r}")
    libexec = '"$(x2gopath libexec)"'
    out, err = run_remote(control, f"{libexec}/x2goinsertsession {display} $(hostname) {name}")
    if out.strip() != "inserted":
        raise RuntimeError(f"x2goinsertsession failed: {out!r} {err!r}")
    out, err = run_remote(
        control,
        f"{libexec}/x2gocreatesession {name} 0123456789abcdef0123456789abcdef {agent_pid} 127.0.0.1 "
        f"{ports['gr']} {ports['snd']} {ports['fs']} -1 -1",
    )
    if err.strip():
        raise RuntimeError(f"x2gocreatesession failed: {out!r} {err!r}")


def main() -> int:
    cfg = json.loads(sys.argv[1])
    # cfg: mode ("stock" | "ours" | "bare"), repo, port, user, client_key, known_hosts, client_root,
    #      session_name, ports {gr, snd, fs}, agent_pid, shares [paths], printing, mimebox,
    #      keys_out (dir: the test gets the session key and host key there),
    #      outer_gcm (optional, mode "ours": install(outer_gcm=...); absent: install()'s default),
    #      env (optional: environment variables set before anything is imported, e.g. opt-outs)
    os.environ.update(cfg.get("env") or {})
    if cfg["mode"] == "ours":
        sys.path.insert(0, cfg["repo"])
        import x2go_sftp.integrate

        # Without the key: install()'s default, as a user calls it.
        kwargs = {"outer_gcm": bool(cfg["outer_gcm"])} if "outer_gcm" in cfg else {}
        first = x2go_sftp.integrate.install(**kwargs)
        second = x2go_sftp.integrate.install(**kwargs)
        emit("installed", first=first, second=second)
    elif cfg["mode"] == "bare":
        # The bare class swap someone will try instead of install().
        sys.path.insert(0, cfg["repo"])
        import x2go.sftpserver

        import x2go_sftp

        x2go.sftpserver.X2GoRevFwTunnelToSFTP = x2go_sftp.X2GoRevFwTunnelToSFTP

    import x2go  # applies python-x2go's gevent monkey patching, as in PyHoca
    import x2go.log
    from x2go.client import X2GoClient

    # As PyHoca: one X2GoClient (printing needs it), sessions registered on it.
    root = cfg["client_root"]
    dirs = {d: os.path.join(root, d) for d in ("client", "sessions", "ssh")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    client = X2GoClient(client_rootdir=dirs["client"], sessions_rootdir=dirs["sessions"],
                        ssh_rootdir=dirs["ssh"], loglevel=x2go.log.loglevel_DEFAULT)
    session = client.register_session(
        server="127.0.0.1", port=cfg["port"], username=cfg["user"],
        key_filename=cfg["client_key"], look_for_keys=False, allow_agent=False,
        add_to_known_hosts=True, known_hosts=cfg["known_hosts"],
        allow_share_local_folders=True, allow_printing=cfg["printing"], allow_mimebox=cfg["mimebox"],
        snd_system="none", return_object=True,
    )
    session.connect()
    control = session.control_session
    name = cfg["session_name"]
    try:
        register_server_session(control, name, cfg["ports"], cfg["agent_pid"])
        if cfg["mode"] == "bare":
            return run_bare(cfg, session, control, name)
        return run_session(cfg, session, control, name)
    finally:
        # Drop the server-side record whatever happened (as x2gocleansessions does), so
        # x2golistsessions stays parseable and the display number is free again.
        try:
            run_remote(control, "perl -MX2Go::Server::DB=dbsys_rmsessionsroot "
                                f"-e 'dbsys_rmsessionsroot(shift)' {name}")
        finally:
            session.disconnect()
        emit("bye")


def run_session(cfg: dict[str, Any], session: Any, control: Any, name: str) -> int:
    """Everything between connecting and disconnecting; returns the exit code."""
    import paramiko
    import x2go.defaults
    import x2go.sftpserver

    # What X2GoControlSession.resume() does, minus X2GoTerminalSession.resume()'s
    # x2goresume-session + nxproxy (the graphical part).
    info = control.list_sessions()[name]
    terminal = control._terminal_backend(
        control, profile_name="x2go-sftp-test", session_info=info,
        info_backend=control._info_backend, list_backend=control._list_backend,
        proxy_backend=control._proxy_backend, client_rootdir=control.client_rootdir,
        session_instance=session, sessions_rootdir=control.sessions_rootdir,
        snd_system="none", logger=session.logger,
    )
    control.associated_terminals[name] = terminal
    control.get_transport().reverse_tunnels[name] = {"sshfs": (0, None), "snd": (0, None)}
    terminal.session_info.local_container = os.path.join(terminal.params.rootdir, f"S-{name}")
    terminal.session_info.remote_container = f"{control._x2go_remote_home}/.x2go/C-{name}"
    session.terminal_session = terminal
    session.session_name = name
    session.virgin, session.running, session.suspended, session.terminated, session.faulty = (
        False, True, False, False, False)
    # What the session registry does once a session runs: it becomes the master session
    # of its profile, the one that shares folders.
    session.set_master_session()

    # X2GoSession.resume(), the folder-sharing part: first the tunnel ...
    terminal.start_sshfs()
    tunnel = control.get_transport().reverse_tunnels[name]["sshfs"][1]

    # Hand the test what sshfs on the server is given, so it can talk to the tunnel itself.
    keys_out = cfg["keys_out"]
    keyfile = os.path.join(keys_out, "session_key")
    with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(private_key_pem(control._x2go_session_auth_rsakey))
    host_key = x2go.defaults.RSAHostKey
    ident = keyfile + ".ident"
    with open(ident, "w") as f:
        f.write(f"[127.0.0.1]:{tunnel.server_port} {host_key.get_name()} {host_key.get_base64()}\n")

    def exports() -> list[str]:
        return sorted(e.local_path for e in getattr(tunnel, "exports", ()))

    emit(
        "tunnel",
        tunnel_class=f"{type(tunnel).__module__}.{type(tunnel).__qualname__}",
        sftpserver_class=f"{x2go.sftpserver.X2GoRevFwTunnelToSFTP.__module__}."
                         f"{x2go.sftpserver.X2GoRevFwTunnelToSFTP.__qualname__}",
        host_key_bits=host_key.get_bits(),
        sshfs_port=tunnel.server_port,
        remote_home=control._x2go_remote_home,
        keyfile=keyfile, ident=ident,
        exports=exports(),
        paramiko=paramiko.__version__,
    )
    wait_command()

    # ... then print spool, MIME box and the folders (X2GoSession.share_local_folder).
    started = time.monotonic()
    if cfg["printing"]:
        terminal.start_printing()
    if cfg["mimebox"]:
        terminal.start_mimebox()
    shared = {path: session.share_local_folder(path) for path in cfg["shares"]}
    transport = control.get_transport()
    emit(
        "shared",
        shared=shared,
        printing_spool=os.path.join(terminal.session_info.local_container, "spool"),
        mimebox=os.path.join(terminal.session_info.local_container, "mimebox"),
        exports=exports(),
        seconds=round(time.monotonic() - started, 3),
        # What python-x2go's control connection now runs (sending, receiving): the
        # cipher every shared byte crosses on the client side.
        ciphers={"local": transport.local_cipher, "remote": transport.remote_cipher},
    )
    while True:
        cmd = wait_command()
        if cmd[0] == "unshare":
            ok = session.unshare_local_folder(cmd[1])
            emit("unshared", path=cmd[1], ok=ok, exports=exports())
        elif cmd[0] == "unshare_all":
            ok = session.unshare_all_local_folders(force_all=True)
            emit("unshared_all", ok=ok, exports=exports())
        elif cmd[0] == "quit":
            break
        else:
            emit("error", message=f"unknown command {cmd!r}")

    # Tear down as python-x2go does on session end, then drop the server-side record.
    terminal.unshare_all_local_folders()
    tunnel.stop_thread()
    return 0


def run_bare(cfg: dict[str, Any], session: Any, control: Any, name: str) -> int:
    """python-x2go's own ``X2GoSession.resume()`` with the bare class swap in place.

    Everything is python-x2go's code (``X2GoSession.resume`` ->
    ``X2GoControlSession.resume`` -> terminal backend ->
    ``start_sshfs`` / ``start_printing`` / ``start_mimebox``, and its handling
    of what they raise) except ``X2GoTerminalSession.resume`` and ``ok``: the
    graphical part (``x2goresume-session`` + ``nxproxy``, see
    ``register_server_session``).  The stand-in does what that method does
    besides, for the folder-sharing part: the session's containers and user.
    """
    terminal_class = control._terminal_backend

    def resume_without_graphics(terminal: Any) -> bool:
        info = terminal.session_info
        info.local_container = os.path.join(terminal.params.rootdir, f"S-{info.name}")
        info.remote_container = f"{terminal.control_session._x2go_remote_home}/.x2go/C-{info.name}"
        info.username = terminal.control_session.remote_username()
        return True

    terminal_class.resume = resume_without_graphics
    terminal_class.ok = lambda terminal: True  # "nxproxy runs"

    resumed = session.resume(session_name=name)
    tunnel = control.get_transport().reverse_tunnels.get(name, {}).get("sshfs", (0, None))[1]
    shared = {path: session.share_local_folder(path) for path in cfg["shares"]}
    emit(
        "resumed",
        resumed=resumed,
        running=session.is_running(),
        sshfs_tunnel=None if tunnel is None else f"{type(tunnel).__module__}.{type(tunnel).__qualname__}",
        folder_sharing=session.is_folder_sharing_available(),
        printing=bool(session._SUPPORTED_PRINTING),
        mimebox=bool(session._SUPPORTED_MIMEBOX),
        shared=shared,
    )
    wait_command()
    if tunnel is not None:  # only without the refusal: tear down what it started
        session.terminal_session.unshare_all_local_folders()
        tunnel.stop_thread()
    return 0


def private_key_pem(key: Any) -> str:
    """The key as PEM text, written the way share_local_folder() writes it (into BytesIO)."""
    import io

    buf = io.BytesIO()
    key.write_private_key(buf)
    return buf.getvalue().decode()


if __name__ == "__main__":
    sys.exit(main())
