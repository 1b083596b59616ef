"""Kernel constants for the handshake netlink family and kTLS.

Values come from the kernel's Documentation/netlink/specs/handshake.yaml,
include/uapi/linux/handshake.h and include/uapi/linux/tls.h.  Nothing else
belongs here.  Beware of the pre-merge draft header that had X509=2/PSK=3:
the values below are the merged ones.

The enums are written as {name: value} tables, the way the header lists them,
so that each value can be checked against it at a glance.
"""

from enum import IntEnum

HANDSHAKE_FAMILY_NAME = "handshake"
HANDSHAKE_FAMILY_VERSION = 1
HANDSHAKE_MCGRP_TLSHD = "tlshd"

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_EXT_ACK = 11
GENL_ID_CTRL = 0x10

# HANDSHAKE_CMD_*: READY is the kernel's notification; ACCEPT and DONE are ours.
HandshakeCmd = IntEnum("HandshakeCmd", {"READY": 1, "ACCEPT": 2, "DONE": 3})

# HANDSHAKE_HANDLER_CLASS_*: the multicast group a request is announced to.
HandlerClass = IntEnum("HandlerClass", {"NONE": 0, "TLSHD": 1})

# HANDSHAKE_MSG_TYPE_*: which side of the TLS handshake the consumer wants.
MsgType = IntEnum("MsgType", {"UNSPEC": 0, "CLIENTHELLO": 1, "SERVERHELLO": 2})

# HANDSHAKE_AUTH_*: how the peer is to be authenticated.
AuthMode = IntEnum("AuthMode", {"UNSPEC": 0, "UNAUTH": 1, "PSK": 2, "X509": 3})

# HANDSHAKE_A_ACCEPT_*: the attributes of an ACCEPT reply.
AcceptAttr = IntEnum(
    "AcceptAttr",
    {
        "SOCKFD": 1,
        "HANDLER_CLASS": 2,
        "MESSAGE_TYPE": 3,
        "TIMEOUT": 4,
        "AUTH_MODE": 5,
        "PEER_IDENTITY": 6,
        "CERTIFICATE": 7,
        "PEERNAME": 8,
        "KEYRING": 9,
    },
)

# HANDSHAKE_A_X509_*: nested in HANDSHAKE_A_ACCEPT_CERTIFICATE.
X509Attr = IntEnum("X509Attr", {"CERT": 1, "PRIVKEY": 2})

# HANDSHAKE_A_DONE_*: the attributes of a DONE request.
DoneAttr = IntEnum("DoneAttr", {"STATUS": 1, "SOCKFD": 2, "REMOTE_AUTH": 3, "TAG": 4})

# The kernel bounds DONE's STATUS with NLA_POLICY_MAX(NLA_U32, MAX_ERRNO).
MAX_ERRNO = 4095
# The kernel keeps at most this many REMOTE_AUTH serials (net/handshake/tlshd.c).
MAX_REMOTE_AUTH = 5
TLS_NO_PEERID = 0

# Key serials are positive int32 values (key_serial_t, include/linux/key.h).
KEY_SERIAL_MAX = 2**31 - 1
# KEY_MAX_DESC_SIZE (include/linux/key.h) is 4096 with the NUL, so a key
# description or keyring name holds at most 4095 bytes.
KEY_DESC_MAX = 4095

# kTLS (include/uapi/linux/tls.h).  Python has no SOL_TLS constants.
SOL_TCP = 6
TCP_ULP = 31
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
# Linux 6.19: the largest plaintext the kernel puts in one TX record (u16; RFC 8449)
TLS_TX_MAX_PAYLOAD_LEN = 5
TLS_1_3_VERSION = 0x0304

# TLS_CIPHER_* (include/uapi/linux/tls.h): the ciphers kTLS offloads for TLS 1.3.
TlsCipher = IntEnum(
    "TlsCipher", {"AES_GCM_128": 51, "AES_GCM_256": 52, "AES_CCM_128": 53, "CHACHA20_POLY1305": 54}
)

IPPROTO_TCP = 6
IPPROTO_QUIC = 261
