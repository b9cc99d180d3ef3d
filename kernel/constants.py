"""Constants quoted from the kernel's UAPI headers (Python's socket module lacks them)."""

# include/uapi/linux/tcp.h
TCP_MAXSEG = 2
TCP_INFO = 11
TCP_REPAIR = 19            # TCP sock is under repair right now
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29     # Get/set window parameters

TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0
TCP_REPAIR_OFF_NO_WP = -1  # Turn off without window probes

# enum { TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE, TCP_QUEUES_NR }
TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

# struct tcp_info.tcpi_options
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

# include/net/tcp.h: option kinds accepted by TCP_REPAIR_OPTIONS
TCPOPT_MAXSEG = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8

# include/uapi/linux/sockios.h and asm-generic/ioctls.h
SIOCINQ = 0x541B           # FIONREAD
SIOCOUTQ = 0x5411          # TIOCOUTQ
SIOCOUTQNSD = 0x894B       # output queue not yet sent

# include/uapi/linux/in.h, in6.h
IP_FREEBIND = 15
IP_TRANSPARENT = 19
IPV6_FREEBIND = 78
IPV6_TRANSPARENT = 75
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
