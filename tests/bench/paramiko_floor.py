"""What one paramiko SSH hop costs per MB, before any SFTP: the floor under the outer connection.

    python -m tests.bench.paramiko_floor            # threads
    python -m tests.bench.paramiko_floor --gevent   # under gevent.monkey.patch_all()

Two paramiko transports in this process talk over a socketpair; one channel
carries 64 MiB one way (``sendall`` of 32 KiB pieces, ``recv`` of up to 1 MiB).
Printed: the process CPU per MB for both ends together (one sender, one
receiver: what one hop of python-x2go's outer connection costs across its two
ends), for each cipher, next to the raw cost of the cipher's primitives on
32 KiB buffers.  Our library's process is one end of the outer hop, so about
half of the figure is spent there before the inner SSH layer or SFTP start.

Each cipher is measured twice, rounds interleaved: paramiko as shipped, and
with the process-wide fixes every tunnel applies to paramiko's own slow spots
(:func:`x2go_sftp.paramiko_compat.fix_speed_defects`: ``asbytes`` on 2.x, the
MAC comparison on every release), the baseline and what python-x2go's
connection costs with x2go-sftp in the process.  Medians of ``--rounds``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import socket
import statistics
import sys
import threading
import time


def hop(cipher: str, size: int) -> tuple[float, float]:
    import paramiko

    class Server(paramiko.ServerInterface):
        def check_auth_none(self, username: str) -> int:
            return paramiko.AUTH_SUCCESSFUL

        def get_allowed_auths(self, username: str) -> str:
            return "none"

        def check_channel_request(self, kind: str, chanid: int) -> int:
            return paramiko.OPEN_SUCCEEDED

    a, b = socket.socketpair()
    server = paramiko.Transport(b)
    server.add_server_key(paramiko.RSAKey.generate(2048))
    ready = threading.Event()
    server.start_server(event=ready, server=Server())
    client = paramiko.Transport(a)
    client.get_security_options().ciphers = (cipher,)
    client.connect()
    ready.wait(30)
    client.auth_none("bench")
    chan = client.open_session()
    peer = server.accept(30)
    assert peer is not None
    piece = b"x" * 32768

    def reader() -> None:
        got = 0
        while got < size:
            data = peer.recv(1 << 20)
            if not data:
                return
            got += len(data)

    t = threading.Thread(target=reader)
    cpu0, wall0 = time.process_time(), time.monotonic()
    t.start()
    sent = 0
    while sent < size:
        chan.sendall(piece)
        sent += len(piece)
    t.join()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    client.close()
    server.close()
    mb = size / 1e6
    return cpu * 1000 / mb, mb / wall


def primitive(name: str, rounds: int = 3000) -> float:
    data = b"x" * 32768
    if name == "hmac-sha2-256":
        key = b"k" * 32
        t0 = time.process_time()
        for _ in range(rounds):
            hmac.new(key, data, hashlib.sha256).digest()
    else:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if name == "aes128-gcm (encrypt + decrypt)":
            gcm = AESGCM(os.urandom(16))
            t0 = time.process_time()
            for i in range(rounds):
                nonce = i.to_bytes(12, "big")
                gcm.decrypt(nonce, gcm.encrypt(nonce, data, b"aad!"), b"aad!")
        else:  # aes128-ctr, encrypt + decrypt
            enc = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(os.urandom(16))).encryptor()
            dec = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(os.urandom(16))).decryptor()
            t0 = time.process_time()
            for _ in range(rounds):
                dec.update(enc.update(data))
    return (time.process_time() - t0) * 1000 / (rounds * len(data) / 1e6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gevent", action="store_true")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.gevent:
        from gevent import monkey

        monkey.patch_all()
    import paramiko

    from x2go_sftp import paramiko_compat

    def fixes(on: bool) -> None:
        if on:
            paramiko_compat.fix_speed_defects()
        else:
            paramiko_compat.restore_asbytes()
            paramiko_compat.restore_mac_compare()

    print(f"# paramiko {paramiko.__version__}, {'gevent' if args.gevent else 'threads'}, "
          f"{args.mib} MiB one way, both ends in this process, medians of {args.rounds} interleaved rounds")
    print("| cipher | paramiko as shipped: CPU ms/MB (both ends) | MB/s "
          "| with x2go-sftp's fixes: CPU ms/MB | MB/s | CPU, fixed / shipped |")
    print("|---|---|---|---|---|---|")
    for cipher in ("aes128-ctr", "aes128-gcm@openssh.com"):
        if cipher not in paramiko.Transport._cipher_info:
            print(f"| {cipher} | (not in this paramiko) | | | | |")
            continue
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for on in (False, True):
                fixes(on)
                runs[on].append(hop(cipher, args.mib << 20))
        fixes(False)
        (cpu0, rate0), (cpu1, rate1) = ((statistics.median(c for c, _ in runs[on]),
                                         statistics.median(r for _, r in runs[on])) for on in (False, True))
        name = f"{cipher} (+ hmac-sha2-256)" if cipher == "aes128-ctr" else cipher
        print(f"| {name} | {cpu0:.2f} | {rate0:.0f} | {cpu1:.2f} | {rate1:.0f} | {cpu1 / cpu0:.2f}x |")
    print()
    print("| primitive on 32 KiB buffers | CPU ms/MB |")
    print("|---|---|")
    for name in ("hmac-sha2-256", "aes128-ctr (encrypt + decrypt)", "aes128-gcm (encrypt + decrypt)"):
        print(f"| {name} | {primitive(name):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
