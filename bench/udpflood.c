/* Send small UDP datagrams to ADDR PORT for SECONDS, as fast as one socket
 * can; print "attempts sent seconds".  C, so that the measure is the
 * kernel's path and not an interpreter's loop. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: udpflood ADDR PORT SECONDS\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) return 2;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&to, sizeof to) < 0) {
        perror("udpflood");
        return 1;
    }
    char payload[16] = "tailsfw-bench";
    double seconds = atof(argv[3]), start = now(), elapsed = 0;
    long attempts = 0, sent = 0;
    while (elapsed < seconds) {
        for (int i = 0; i < 256; i++, attempts++)
            if (send(s, payload, sizeof payload, 0) >= 0) sent++;
        elapsed = now() - start;
    }
    printf("%ld %ld %.6f\n", attempts, sent, elapsed);
    return 0;
}
