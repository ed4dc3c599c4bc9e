#!/usr/bin/perl
# Verify the ARC chain (RFC 8617) of the message on standard input with
# Mail::DKIM::ARC::Verifier, asking the DNS server at HOST:PORT for the keys.
#
#   perl arc_verify.pl HOST PORT < message
#
# Prints "RESULT (DETAIL)"; exit status 0 when the chain is a pass, 1 otherwise.
use strict;
use warnings;
use Mail::DKIM::ARC::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my ($host, $port) = @ARGV;
die "usage: $0 HOST PORT < message\n" unless defined $port;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => [$host], port => $port, recurse => 1, tcp_timeout => 5, udp_timeout => 5, retry => 1));

my $arc = Mail::DKIM::ARC::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $arc->PRINT($line);
}
$arc->CLOSE;
printf "%s (%s)\n", $arc->result, $arc->result_detail // '';
exit($arc->result eq 'pass' ? 0 : 1);
