"""From registration and commits to checkpoint records: pure, root-free.

The agent dumps an endpoint through TCP_REPAIR once, at registration, while the
application waits (``protocol.register``). After that no repair mode is needed: the
application's library counts every byte it reads and writes (R, W), so sequence numbers
follow from the registration anchors::

    copied_seq(R) = reg.copied_seq + (R - R_reg)          (receive side)
    write_seq(W)  = reg.write_seq  + (W - W_reg)          (send side)

and the options, window scales and MSS never change after the handshake. A checkpoint is
then the registration ICI *re-anchored* (``checkpoint_ici``):

- receive side at the commit offset I: copied_seq = rcv_nxt = seq(I), empty receive
  queue. The ACK gate never acknowledged beyond I, so the peer still holds the rest;
  except the bytes the kernel had acknowledged before registration (a client that speaks
  first): those not yet committed travel in the record as the receive queue.
- send side, logged output (the application sent its unacknowledged bytes along):
  write_seq = seq(W), the bytes as the sent queue, snd_una = write_seq - len(bytes).
- send side, regenerable output (no bytes): anchored at the peer's acknowledged position
  A (read by the agent from TCP_INFO's byte counters, which need no repair mode, capped
  at W): write_seq = snd_una = seq(A), empty queue. The application regenerates from O.

``checkpointd.offsets.StreamCheckpoint.from_ici(ici, input_offset=I, output_offset=O,
read_offset=I, write_offset=W or A)`` reads it back for resurrection.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel.ici import ICI

SEQ = 0xFFFFFFFF


@dataclass(frozen=True)
class Registration:
    """What the agent keeps of one connection from its registration dump."""

    ici: ICI          # dumped at registration (queues as they were then)
    read: int         # R_reg: the application's read offset at registration
    write: int        # W_reg: its write offset at registration
    bytes_acked: int  # TCP_INFO tcpi_bytes_acked at registration
    rcv_wscale: int
    bytes_received: int = 0  # TCP_INFO tcpi_bytes_received, read after the dump

    def received_offset(self, bytes_received_now: int) -> int:
        """The input offset up to which the kernel has received (and, without the ACK
        gate, acknowledged) data. ``bytes_received`` was read after the registration
        dump, so this never falls short of the truth; it may exceed it by what arrived
        in between, which only makes a re-protected connection wait for a later commit."""
        return self.read + len(self.ici.recv_queue) + (bytes_received_now - self.bytes_received)

    @property
    def una_offset(self) -> int:
        """Stream offset of snd_una at registration."""
        return self.write - ((self.ici.write_seq - self.ici.snd_una) & SEQ)

    def seq_of_read(self, offset: int) -> int:
        return (self.ici.copied_seq + offset - self.read) & SEQ

    def seq_of_write(self, offset: int) -> int:
        return (self.ici.write_seq + offset - self.write) & SEQ

    def acked_offset(self, bytes_acked_now: int) -> int:
        """The peer's acknowledged output offset, from TCP_INFO's 64-bit counter."""
        return self.una_offset + (bytes_acked_now - self.bytes_acked)


def checkpoint_ici(reg: Registration, *, input_offset: int, write_offset: int,
                   unacked: bytes, acked_offset: int | None, ts_val: int, wall_ns: int) -> tuple[ICI, int]:
    """The ICI to store for a commit, and the write offset it is anchored at.

    ``unacked``: the application's unacknowledged output (logged mode), or b"" with
    ``acked_offset`` (regenerable mode). Raises ValueError on offsets that contradict the
    registration (the application's library is broken).
    """
    if input_offset < reg.read:  # the kernel acknowledged those before the gate was up
        raise ValueError(f"input offset {input_offset} is before the registration's read offset {reg.read}")
    if write_offset < reg.write:
        raise ValueError(f"write offset {write_offset} is before the registration's {reg.write}")
    rcv = reg.seq_of_read(input_offset)
    # Bytes the kernel acknowledged before the gate was up (the registration's receive
    # queue) will not be sent again: past the commit offset they travel in the record.
    held = reg.read + len(reg.ici.recv_queue) - input_offset
    recv_queue = reg.ici.recv_queue[len(reg.ici.recv_queue) - held:] if held > 0 else b""
    rcv_nxt = (rcv + len(recv_queue)) & SEQ
    if unacked:
        anchor = write_offset
        queue = bytes(unacked)
    else:
        anchor = write_offset if acked_offset is None else min(write_offset, max(acked_offset, reg.una_offset))
        queue = b""
    write_seq = reg.seq_of_write(anchor)
    ici = reg.ici.replace(
        rcv_nxt=rcv_nxt, copied_seq=rcv, recv_queue=recv_queue,
        write_seq=write_seq, snd_nxt=write_seq, snd_una=(write_seq - len(queue)) & SEQ,
        sent_queue=queue, unsent_queue=b"",
        ts_val=ts_val if reg.ici.timestamps else 0, dump_time_ns=wall_ns,
        **_window_at(reg.ici, rcv_nxt))
    return ici.validate(), anchor


def _window_at(ici: ICI, rcv_nxt: int) -> dict:
    """Registration-time window values kept valid against the new rcv_nxt (the kernel's
    tcp_repair_set_window checks): what does not fit is pulled back to rcv_nxt."""
    if not ici.has_window:
        return {}

    def after(a, b):
        return ((a - b) & SEQ) not in (0,) and ((a - b) & SEQ) < 1 << 31

    rcv_wup = rcv_nxt if after(ici.rcv_wup, rcv_nxt) else ici.rcv_wup
    snd_wl1 = ici.snd_wl1 if not after(ici.snd_wl1, (rcv_nxt + ici.rcv_wnd) & SEQ) else rcv_nxt
    return dict(rcv_wup=rcv_wup, snd_wl1=snd_wl1)
